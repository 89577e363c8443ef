"""The method itself, in plain PyTorch: topology, network, operators, optimiser state,
criteria, the evolutionary policy, the export. No Lightning import here or below."""
