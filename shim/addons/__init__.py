"""Behaviour plugged into the data path and the control plane (see ``shim.addons.base``)."""
