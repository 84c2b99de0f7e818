"""Imported by the readers' fork server only (`multiprocessing.set_forkserver_preload` in
app_dist.data.workers), before the server installs its own handlers: the server and every
reader forked from it ignore the stop signals (app_dist.foundations.signals).

Launchers and schedulers deliver a pre-emption to a whole process group (torchrun signals
each rank's group, `timeout`, SLURM and Kubernetes signal everything). The fork server is in
the rank's group; had it died, each reader's parent would change, torch's DataLoader watchdog
would end the readers, and the rank's step in flight would fail before it could write its
pre-emption checkpoint. Ignoring the signals leaves the decision to the rank; the server still
exits when the rank does (its "alive" pipe closes), and readers exit with their rank
(app_dist.data.workers: pidfd watch, `stop_readers`).
"""

from app_dist.foundations.signals import ignore_preemption_signals

ignore_preemption_signals()
