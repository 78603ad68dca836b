"""The demo application: the ``fp4compile`` console script and what it runs, built on the library's public API.

The library is the rest of the package (``fp4compile.quantize``, ``Recipe``, ``nvfp4_linear``, the ``nvfp4``
backend, ``OsciReset``, ...); nothing in it imports this subpackage. Its modules:

- :mod:`~fp4compile.demo.cli`: the ``fp4compile`` command (``quantizers``, ``train``, ``bench``, ``explain``);
- :mod:`~fp4compile.demo.train`: ``fp4compile train``, one small byte-level GPT trained per recipe, compared;
- :mod:`~fp4compile.demo.gpt`: that GPT in plain torch (also the model of ``fp4compile explain``);
- :mod:`~fp4compile.demo.corpus`: its training data, this Python's own standard-library source;
- :mod:`~fp4compile.demo.plot`: the loss plot of a run (``python -m fp4compile.demo.plot RESULTS_JSON OUT_PNG``);
- :mod:`~fp4compile.demo.bench`: the linear-layer benchmark of ``fp4compile bench`` and ``benchmarks/bench_linear``;
- :mod:`~fp4compile.demo.quantizer_report`: the error statistics of ``fp4compile quantizers`` and README's
  quantizer table;
- :mod:`~fp4compile.demo.report`: the environment record, table formatters and median timer shared by the
  commands and ``benchmarks/``.

Importing this package imports none of them and changes no global state.
"""

__all__ = ["bench", "cli", "corpus", "gpt", "plot", "quantizer_report", "report", "train"]
