"""Kernels: their state, registry, warm pool, launch (provisioner, fork server) and reaper.

Kept free of imports: the fork server's child and every kernel import modules below this
package, and must not pay for the registry's."""
