"""The one host-sync guard of the tests: every Python-level way to read a tensor value on the host raises."""

from contextlib import ExitStack, contextmanager
from unittest import mock

import torch

SYNCS = ("item", "__bool__", "tolist", "__float__", "__int__", "__index__")


class HostSync(AssertionError):
    pass


@contextmanager
def no_host_sync():
    with ExitStack() as stack:
        for name in SYNCS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, side_effect=HostSync(f"Tensor.{name}")))
        yield
