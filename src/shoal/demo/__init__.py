"""``make demo``: a small shop on a local mesh (``__main__``, ``shop``, ``load``,
``payments.js``); and ``echo``, the sample HTTP service the test suite proxies to."""
