"""Throughput benchmarks: one framework, `python -m benchmarks SUITE [flags] [--json FILE] [--png FILE]`.

core/    what every suite shares: the command line (train.py's flags and presets plus the measurement
         flags), clocks that do not perturb what they time, host CPU and memory accounting, the Record
         every suite returns (the JSON schema), its tables and charts
suites/  one module a measurement, registered in suites/__init__.py
studies/ finished design studies, each run as `python -m benchmarks.studies.NAME`
tools/   beside the framework: the ImageNet-like JPEG generator, the GPU session script
results/ committed JSON (and PNG) results; `python -m benchmarks chart results/*.json` draws any of them
"""
