"""Design studies: measurements that settled a design and are kept runnable beside their committed results, but
are not suites. Each runs as `python -m benchmarks.studies.NAME`, takes a suite's flags (train.py's and the
measurement flags) and writes the same JSON schema under its old suite name, so `chart` reads its results.

    ffcv_cost  host CPU per image of FFCV's decode and crop against the torch loader's (needs ffcv)
    augment    the batched GPU augmentation against kornia's (needs kornia)
"""
