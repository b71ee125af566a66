"""The per-run machinery: what the pack does during one training run, for any training loop (no transformers).

=================  =================================================================================
module             what it holds
=================  =================================================================================
``run``            :class:`ClipRun`: one run, built at train begin, closed at train end
``backends``       the step backend of a run (:class:`LocalStep`; DeepSpeed's in
                   :mod:`gradclip_hf.integrations.deepspeed`): where the clip and the skip happen
``decision``       :func:`skip_update`: the one decision, skip this update or not (and
                   ``skip_before_update``: the part known before an engine steps inside backward)
``gate``           :class:`StepGate`: the decision and the clip multiplier inside ``optimizer.step()``
``actions``        rollback, stop, the watchdogs; whether the decision must be read on the host
``metrics``        the step loss and the logging window (one transfer per logging step)
``records``        the spike file's records, kept on the device until read (:mod:`gradclip_hf.spikefile`
                   writes them)
``batches``        which batch a flagged step trained on (fingerprints, dataset indices)
``messages``       per-layer norms in the logs, the spike messages, the logger
``skiplists``      a skip list checked against the run that applies it
``compat``         the private torch / accelerate details of the optimizer this relies on
=================  =================================================================================

The integrations (:mod:`gradclip_hf.integrations`) build a :class:`ClipRun` with the backend their loop needs and
call it from their hooks: the Trainer's callbacks and overrides, ``AcceleratorClipper``'s ``clip_()``.
"""

from .backends import LocalStep, StepBackend
from .decision import skip_update
from .gate import StepGate
from .run import RESET_HINT, STOP_KEY, ClipRun

__all__ = ["ClipRun", "StepBackend", "LocalStep", "StepGate", "skip_update", "RESET_HINT", "STOP_KEY"]
