"""`python -m mlx_flash.inspect STORE`: the manifest as a table; verify everything.

Opening a store runs the cheap checks (manifest, configs, the dense part's safetensors
header, file size, bundles header and layout digest). `--verify` (the default) then
reads every byte of `ffn.bundles`: each section against its SHA-256, the header's tail
and all alignment padding against zeros, and the predictors (if any) against theirs.
"""

import argparse

from .errors import exit_on_error
from .predictor import MANIFEST_NAME as PREDICTORS
from .predictor import load_predictors
from .store.store import BundleStore


def describe(store: BundleStore) -> str:
    m = store.manifest
    lines = [
        f"store        {store.path}",
        f"format       v{m.format_version}, layout {m.layout}",
        f"arch         {m.architecture} ({m.activation}), hidden {m.hidden_size}, "
        f"FFN {m.intermediate_size}, {len(m.layers)} layers",
        f"source       {m.source.get('kind')} {m.source.get('path')}",
        f"bundles      {m.file_bytes / 2**20:.1f} MiB",
        "components   "
        + ", ".join(
            f"{c.name} [{c.encoding.describe()}, {c.nbytes} B]"
            for c in m.components.values()
        ),
        "",
        f"{'layer':>5} {'neurons':>8} {'section':<28} {'offset':>12} {'bundle B':>9} "
        f"{'MiB':>8}  sha256",
    ]
    for i, layer in enumerate(m.layers):
        for s in layer.sections:
            lines.append(
                f"{i:>5} {layer.neurons:>8} {'+'.join(s.components):<28} {s.offset:>12} "
                f"{s.bundle_bytes:>9} {layer.neurons * s.bundle_bytes / 2**20:>8.2f}  "
                f"{s.sha256[:16]}"
            )
    return "\n".join(lines)


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
                f"\nverified: every checksum of {len(m.layers)} layers matches, "
                "padding is zeros"
            )
            if (store.path / PREDICTORS).is_file():
                neurons = [layer.neurons for layer in m.layers]
                load_predictors(store.path, m.hidden_size, neurons)
                print("verified: the predictors match their checksum and the model")
        store.close()


if __name__ == "__main__":
    main()
