"""`python -m mlx_flash.inspect STORE`: the manifest as a table; verify everything.

Opening a store runs the cheap checks (manifest, configs, the dense part's safetensors
header, file size, bundles header and layout digest). `--verify` (the default) then
reads every byte of `ffn.bundles` and `model.safetensors` against the block checksums
(and the predictors, if any, against theirs). Every lossy step the conversion took is
listed.
"""

import argparse

from .errors import exit_on_error
from .predictor import MANIFEST_NAME as PREDICTORS
from .predictor import load_predictors
from .store.store import BundleStore


def describe(store: BundleStore) -> str:
    m = store.manifest
    encodings = {}
    kinds = [  # rows, and the columns extension's (§7.1)
        (entries, " cols" if unit == "channels" else "")
        for entries, unit in m.bundle_kinds()
    ]
    for entries, suffix in kinds:
        for i, layer in enumerate(entries):
            for c in layer.components.values():
                name = c.name + suffix
                key = (name, c.encoding.describe(), c.origin.kind, c.origin.exact)
                encodings.setdefault(key, []).append(i)
    lines = [
        f"store        {store.path}",
        f"format       v{m.format_version}, layout {m.layout}",
        f"arch         {m.architecture} ({m.activation}), hidden {m.hidden_size}, "
        f"FFN {m.intermediate_size}, {len(m.layers)} layers",
        f"source       {m.source.get('kind')} {m.source.get('path')}",
        f"bundles      {m.file_bytes / 2**20:.1f} MiB",
        "extensions   "
        + (", ".join(f"{e.name} ({e.bytes} B)" for e in m.extensions) or "none"),
        "",
        f"{'component':<16} {'stored as':<32} {'from':<16} {'exact':<6} layers",
    ]
    for (name, enc, kind, exact), layers in encodings.items():
        lines.append(
            f"{name:<16} {enc:<32} {kind:<16} {'yes' if exact else 'no':<6} "
            f"{_ranges(layers)}"
        )
    steps = m.lossy_steps()
    lines += [
        "",
        "lossy steps  "
        + ("none: every stored value is the source's" if not steps else ""),
    ]
    lines += [f"  {line}" for line in steps]
    lines += [
        "",
        f"{'layer':>5} {'neurons':>8} {'section':<28} {'offset':>12} {'bundle B':>9} "
        f"{'MiB':>8}",
    ]
    for entries, suffix in kinds:  # (a columns layer's "neurons" are its channels)
        for i, layer in enumerate(entries):
            for s in layer.sections:
                what = (
                    "+".join(s.components) + suffix + (f" {s.part}" if s.part else "")
                )
                lines.append(
                    f"{i:>5} {layer.neurons:>8} {what:<28} {s.offset:>12} "
                    f"{s.bundle_bytes:>9} "
                    f"{layer.neurons * s.bundle_bytes / 2**20:>8.2f}"
                )
    return "\n".join(lines)


def _ranges(ids) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a != start else f"{a}")
            start = b
    return ", ".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Show and verify an mlx_flash store.")
    parser.add_argument("store", help="The store directory")
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Read the whole store and check every checksum (default; --no-verify "
        "runs only the cheap checks done at every load)",
    )
    args = parser.parse_args(argv)
    with exit_on_error():
        store = BundleStore(args.store)
        print(describe(store))
        if args.verify:
            store.verify()
            m = store.manifest
            print(
                f"\nverified: every 4 KiB block of {len(m.layers)} layers and the "
                "dense part matches its checksum"
            )
            if (store.path / PREDICTORS).is_file():
                neurons = [layer.neurons for layer in m.layers]
                load_predictors(store.path, m.hidden_size, neurons)
                print("verified: the predictors match their checksum and the model")
        store.close()


if __name__ == "__main__":
    main()
