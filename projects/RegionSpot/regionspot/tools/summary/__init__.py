"""The parts of ``regionspot-summarize`` (:mod:`regionspot.tools.summarize`, the command): reading
evaluation outputs into rows (:mod:`.rows`), the table as text and Markdown (:mod:`.report`),
the bar chart (:mod:`.chart`) and writing both (:mod:`.outputs`)."""
