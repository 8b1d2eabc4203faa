"""Engine integrations: each module maps one serving engine's internals onto the tap points of DESIGN section 3."""
