"""YAML recipe -> validated, frozen :class:`~compress.pipeline.config.Recipe`.

The YAML is read with ``yaml.safe_load`` (no code-executing tags) and every mapping is checked
against its dataclass: unknown keys get a "did you mean", wrong types and out-of-range values
name the field's full path (``stages[1].distill.train.epochs``). Command-line overrides are
applied to the raw mapping before validation, so they are checked exactly like the file.

:mod:`.load` reads (YAML, overrides), :mod:`.convert` builds the dataclasses, :mod:`.checks`
validates across fields and against the filesystem, :mod:`.overrides` applies ``--set``, and
:mod:`.serialise` writes a recipe back.
"""
