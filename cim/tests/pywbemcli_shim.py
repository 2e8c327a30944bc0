#!/usr/bin/env python3
"""Runs pywbemcli with one fix: pywbemcli 1.4 calls list() on the IterQueryInstancesReturn that
pywbem's IterQueryInstances gives, which is not iterable, so `pywbemcli instance query` fails
against every real WBEM server. Making that object iterable is all this does."""
import sys

import pywbem

if not hasattr(pywbem._cim_operations.IterQueryInstancesReturn, "__iter__"):
    pywbem._cim_operations.IterQueryInstancesReturn.__iter__ = lambda self: iter(self.generator)

from pywbemtools.pywbemcli.pywbemcli import cli  # noqa: E402

sys.exit(cli())
