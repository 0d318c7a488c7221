"""A model: its config and layout, its classes on the meta device, which module each tensor belongs to, and
which weights a 4-bit load quantizes."""
