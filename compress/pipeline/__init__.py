"""The recipe pipeline on top of the library: YAML -> specs (:mod:`.recipe`), the stages
(thin adapters over the library verbs, :mod:`.stages`), the run folder with its records,
resume and lock, the report and the CI gates.

:data:`~compress.pipeline.config.STAGE_KINDS` is the table of stage kinds.
"""
