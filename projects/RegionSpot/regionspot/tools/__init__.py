"""The project's command-line tools, one module per tool, each with ``main(argv=None) -> int``.

Run them as ``python tools/<name>.py ...`` from the repository (thin wrappers), as
``python -m regionspot.tools.<name> ...``, or through the console scripts ``setup.py`` installs
(``regionspot-benchmark``, ``regionspot-proposals``, ...). What they share is in
:mod:`regionspot.tools.common`.
"""
