"""Everything that touches a model or a device."""
