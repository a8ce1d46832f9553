"""Show where one neuron's bundle lies in a store and what its components decode to.

python tools/dump_neuron.py STORE LAYER NEURON
"""

import argparse

import mlx.core as mx
import numpy as np

from mlx_flash.store.format import assemble, dequantize, gather_parts
from mlx_flash.store.store import BundleStore


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("store")
    p.add_argument("layer", type=int)
    p.add_argument("neuron", type=int)
    args = p.parse_args()
    store = BundleStore(args.store)
    m = store.manifest
    entry = m.layers[args.layer]
    parts = {}  # component -> its parts, from every section (planar: one each)
    for section in entry.sections:
        start = section.offset + args.neuron * section.bundle_bytes
        raw = np.frombuffer(store.reader.read(start, section.bundle_bytes), np.uint8)
        comps = entry.section_components(section)
        held = ", ".join(c.name + (f" {c.part}" if c.part else "") for c in comps)
        print(
            f"bytes {start}-{start + section.bundle_bytes} "
            f"({section.bundle_bytes} B): {held}"
        )
        gather_parts(raw[None].copy(), comps, parts)
    for name, got in parts.items():
        c = entry.components[name]
        values = np.array(dequantize(assemble(c, got, mx.float32), c.length))[0]
        print(
            f"  {name:<14} {c.nbytes:>6} B  {c.encoding.describe():<24} "
            f"{np.array2string(values[:6], precision=4)} ... "
            f"|max| {abs(values).max():.4f}"
        )
    store.close()


if __name__ == "__main__":
    main()
