"""Tables, files and figures of a surgery run (no Lightning: they work from plain data)."""
