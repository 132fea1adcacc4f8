"""The subcommands of ``regionspot-benchmark`` (:mod:`regionspot.tools.benchmark`), one module
each, and what they share (:mod:`.timing`, :mod:`.report`). A subcommand module imports the
shared modules only: never the dispatcher nor another subcommand."""
