"""hostvold: the hypervisor-side volume daemon."""

__version__ = "0.1.0"
