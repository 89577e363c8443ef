"""The Lightning side: the module that owns a mutable topology, the fit loop that operates
between epochs, the report callback and train.py's LightningCLI."""
