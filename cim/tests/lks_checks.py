"""What lockstep's pywbem test scripts share: the namespace, the VM class, a check counter that
prints each failure with what was expected, and small helpers. Imported by the scripts next to
it (python puts a script's own folder on the import path)."""
import socket

import pywbem

NS = "root/cimv2"
VM_CLASS = "LKS_VirtualComputerSystem"


class Checker:
    """Counts checks; prints each failed one."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, cond, what):
        if cond:
            self.passed += 1
        else:
            self.failed += 1
            print(f"FAIL: {what}", flush=True)
        return cond

    def expect_error(self, status, fn, what):
        """Calls fn, which must fail with CIM status `status`; returns the error's text."""
        try:
            fn()
        except pywbem.CIMError as e:
            self.check(e.status_code == status, f"{what}: expected CIM status {status}, got {e.status_code} ({e})")
            return str(e)
        self.check(False, f"{what}: expected CIM status {status}, got success")
        return ""


def vm_path(name):
    return pywbem.CIMInstanceName(VM_CLASS, {"CreationClassName": VM_CLASS, "Name": name}, namespace=NS)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
