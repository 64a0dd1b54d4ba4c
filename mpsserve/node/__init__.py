"""The node layer: the MPS control daemon (control, hook, guardian, state, doctor), GPU faults
and the node's metrics sampler."""
