"""Show where one neuron's bundle lies in a store and what its components decode to.

python tools/dump_neuron.py STORE LAYER NEURON
"""

import argparse

import mlx.core as mx
import numpy as np

from mlx_flash.store.format import bundle_offsets, decode_rows, dequantize
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
    for section in entry.sections:
        start = section.offset + args.neuron * section.bundle_bytes
        raw = np.frombuffer(store.reader.read(start, section.bundle_bytes), np.uint8)
        print(
            f"bytes {start}-{start + section.bundle_bytes} ({section.bundle_bytes} B)"
        )
        comps = entry.section_components(section)
        for c, (at, size) in zip(comps, bundle_offsets(comps).values()):
            w = decode_rows(raw[None, at : at + size], c, mx.float32)
            values = np.array(dequantize(w, c.length))[0]
            print(
                f"  {c.name:<14} +{at:<6} {size:>6} B  {c.encoding.describe():<24} "
                f"{np.array2string(values[:6], precision=4)} ... "
                f"|max| {abs(values).max():.4f}"
            )
    store.close()


if __name__ == "__main__":
    main()
