"""The foundations every domain stands on, importing no torch at module level: the field
conventions of the specs, registries, atomic file writes, the typed records stages hand each
other, torch.distributed helpers, and what a benchmark records about the machine."""
