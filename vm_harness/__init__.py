"""The VM harness: what boots QEMU and a Linux guest beside vballoon.

Test environment provisioning (:mod:`~vm_harness.provision`, :mod:`~vm_harness.testenv`),
the one QEMU launcher (:mod:`~vm_harness.vm`), the guest agent, the guest module's
build, the VM benchmark and the VM demo. The device process (``vballoon``) imports
none of it at module level; ``vballoon demo`` and ``vballoon bench vm`` import it when run.
"""
