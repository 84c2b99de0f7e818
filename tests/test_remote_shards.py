"""Shards in object storage and behind HTTP (data.shards = s3://... or http://...), read from
real servers started here: moto's S3 server and Python's HTTP server, each its own process on
127.0.0.1. Runs from them equal the run from local shards; outages are servers stopped from
outside; a shard changed on the server is a real file changed there."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from app_dist.config import DataSettings, load_config
from app_dist.data.manifest import Manifest
from app_dist.data.shard_cache import ShardCache
from app_dist.data.shard_files import entry_name
from app_dist.data.source import RemoteShards, load_manifest, open_shards
from app_dist.foundations.errors import ConfigError, DataError
from app_dist.foundations.files import file_sha256
from app_dist.foundations.run_layout import RunLayout
from app_dist.foundations.storage import check_location, redact
from app_dist.models.sparse_file import load_exported
from app_dist.results.export import export_run
from app_dist.sweep import load_sweep
from app_dist.training.anytime import MODEL_FILE, POINTER_FILE
from app_dist.training.checkpoint import verify

from .conftest import (
    REPO,
    checkpoint_folder,
    deepspeed_run_args,
    digits_run_args,
    launch_trainer,
    read_metrics,
    run_trainer,
    trainer_env,
    wait_for,
)
from .storage_servers import HttpShardServer, S3Server, require

# ------------------------------------------------------------------------- URLs and schemes


def test_urls_in_messages_lose_credentials_query_strings_and_fragments():
    assert redact("https://user:secret@host:8443/a/b?X-Amz-Signature=abc#frag") == \
        "https://host:8443/a/b"
    assert redact("s3://bucket/prefix") == "s3://bucket/prefix"
    assert redact("/data/shards") == "/data/shards"


@pytest.mark.parametrize("location", ["pipe:curl -s http://x/a.tar", "ftp://host/shards",
                                      "hdfs://namenode/shards"])
def test_unsupported_schemes_and_pipe_commands_are_refused_naming_the_key(location):
    with pytest.raises(ConfigError, match="config key 'data.shards'.*not supported"):
        check_location(location)


# ------------------------------------------------------------------ the cache, in this process


@pytest.fixture(scope="module")
def served(digits_shards, tmp_path_factory):
    """A copy of the digits shards behind a real HTTP server (tests may change the copy)."""
    require("aiohttp")
    folder = shutil.copytree(digits_shards, tmp_path_factory.mktemp("served") / "digits")
    server = HttpShardServer(folder)
    server.start()
    yield server
    server.stop()


def remote_settings(cache: Path, **changes) -> DataSettings:
    return DataSettings(cache_dir=str(cache), fetch_backoff_s=0.1, **changes)


def test_each_shard_is_fetched_once_verified_and_the_cache_keeps_to_its_bound(served, tmp_path):
    settings = remote_settings(tmp_path / "cache")
    manifest = load_manifest(served.url, settings)
    assert manifest == Manifest.load(served.folder)
    shards = manifest.splits["train"].shards
    source = open_shards(served.url, settings)
    assert isinstance(source, RemoteShards)
    source.ensure(shards[:4])
    source.ensure(shards[:4])  # a replay epoch: nothing fetched again
    assert source.fetched_shards == 4
    for shard in shards[:4]:
        assert file_sha256(source.files.path(shard)) == shard.sha256
        assert source.files.path(shard).name == entry_name(shard)

    # A bound of three shards: the next pass's shards stay, the least recently used go.
    bound = 3 * max(source.files.path(shard).stat().st_size for shard in shards[:4])
    small = open_shards(served.url, remote_settings(tmp_path / "cache",
                                                    cache_max_gb=bound / (1 << 30)))
    small.ensure(shards[4:7])
    kept = {path.name for path in (tmp_path / "cache").iterdir() if not path.name.startswith(".")}
    assert kept == {entry_name(shard) for shard in shards[4:7]}
    assert not any((tmp_path / "cache" / ".partial").iterdir())


def test_partial_downloads_left_by_killed_processes_are_removed_once_abandoned(tmp_path):
    partial = tmp_path / "cache" / ".partial"
    partial.mkdir(parents=True)
    abandoned, live = partial / "a-train-000001.tar.123.1", partial / "b-train-000002.tar.456.2"
    for path in (abandoned, live):
        path.write_bytes(b"half a shard")
    two_hours_ago = time.time() - 7200
    os.utime(abandoned, (two_hours_ago, two_hours_ago))
    ShardCache(tmp_path / "cache", 1 << 30)
    assert not abandoned.exists() and live.exists()


def test_a_shard_changed_on_the_server_is_refused_and_named(served, tmp_path):
    settings = remote_settings(tmp_path / "cache")
    manifest = load_manifest(served.url, settings)
    changed = manifest.splits["test"].shards[-1]
    path = served.folder / changed.name
    original = path.read_bytes()
    middle = len(original) // 2
    changed_bytes = original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1:]
    path.write_bytes(changed_bytes)  # the server now serves other bytes under the same name
    try:
        with pytest.raises(DataError) as refused:
            open_shards(served.url, settings).ensure([changed])
    finally:
        path.write_bytes(original)
    assert str(refused.value).startswith(f"{served.url}/{changed.name}: sha256 ")
    assert "does not match the manifest's" in str(refused.value)
    assert not (tmp_path / "cache" / entry_name(changed)).exists()


def test_a_missing_shard_fails_at_once_and_a_server_that_is_gone_after_the_retries(tmp_path):
    require("aiohttp")
    folder = tmp_path / "empty"
    folder.mkdir()
    server = HttpShardServer(folder)
    server.start()
    settings = remote_settings(tmp_path / "cache", fetch_attempts=3)
    try:
        with pytest.raises(DataError, match=r"manifest.json: no such file$"):
            load_manifest(f"{server.url}/nothing-here", settings)
    finally:
        server.stop()
    started = time.monotonic()
    with pytest.raises(DataError) as gone:
        load_manifest(f"http://reader:token@127.0.0.1:{server.port}/shards?sig=1", settings)
    assert time.monotonic() - started >= 0.3  # waited 0.1 + 0.2 s between the 3 attempts
    assert str(gone.value).startswith(f"http://127.0.0.1:{server.port}/shards/manifest.json: "
                                      "cannot fetch (Cannot connect")
    assert str(gone.value).endswith("after 3 attempt(s)")
    assert "token" not in str(gone.value) and "sig" not in str(gone.value)


def test_a_sweep_passes_a_shard_url_to_its_trials_unchanged_after_reading_its_manifest(served):
    url = f"{served.url}/?token=abc"
    sweep = load_sweep(REPO / "configs" / "sweep_digits.yaml", [f"data.shards={url}"],
                       root=REPO)
    overrides = sweep.trial_overrides("t_00000", {d.key: d.values[0] for d in sweep.dimensions})
    assert load_config(sweep.base_config, overrides).data.shards == url
    with pytest.raises(ConfigError, match=r"training key 'data.shards'.*/nope/manifest.json: "
                                          "no such file"):
        load_sweep(REPO / "configs" / "sweep_digits.yaml", [f"data.shards={served.url}/nope"],
                   root=REPO)


FETCH_IN_ANOTHER_PROCESS = """
import json, sys
from app_dist.config import DataSettings, load_config
from app_dist.data.source import load_manifest, open_shards
url, cache = sys.argv[1], sys.argv[2]
settings = DataSettings(cache_dir=cache)
manifest = load_manifest(url, settings)
source = open_shards(url, settings)
source.ensure(manifest.splits["train"].shards)
print(json.dumps(source.fetched_shards))
"""


def test_processes_fetching_the_same_shards_at_once_share_one_verified_copy(served, tmp_path):
    cache = tmp_path / "shared-cache"
    command = [sys.executable, "-c", FETCH_IN_ANOTHER_PROCESS, served.url, str(cache)]
    processes = [subprocess.Popen(command, cwd=REPO, env=trainer_env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(3)]
    results = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), results
    shards = Manifest.load(served.folder).splits["train"].shards
    assert sum(json.loads(out) for out, _ in results) == len(shards)  # each fetched once
    for shard in shards:
        assert file_sha256(cache / entry_name(shard)) == shard.sha256
    assert not any((cache / ".partial").iterdir())


# ------------------------------------------------------------------------ training runs


class AnytimeWatcher(threading.Thread):
    """A serving system's loop: read model.json, then the model it names, until stopped.
    Records the megabatch of every consistent pair (the file's sha256 is the pointer's; else
    a newer model landed between the two reads) and any read that fails."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.seen: list[int] = []
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                pointer = json.loads((self.folder / POINTER_FILE).read_text())
                data = (self.folder / MODEL_FILE).read_bytes()
            except FileNotFoundError:  # nothing published yet
                time.sleep(0.02)
                continue
            try:
                model = torch.load(io.BytesIO(data), weights_only=True)
            except Exception as error:  # noqa: BLE001 - a half-written file would land here
                self.failures.append(repr(error))
                continue
            if hashlib.sha256(data).hexdigest() == pointer["sha256"]:
                if model["source"]["megabatch"] != pointer["megabatch"]:
                    self.failures.append(f"pointer {pointer['megabatch']} names a model of "
                                         f"megabatch {model['source']['megabatch']}")
                self.seen.append(pointer["megabatch"])
            time.sleep(0.02)


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_runs_from_s3_and_from_http_at_once_equal_the_run_from_local_shards(
        digits_shards, uninterrupted, tmp_path):
    """Both runs share one node's shard cache while they run, as two jobs of a node do. Each
    publishes its anytime model after every megabatch: the S3 run to S3, the HTTP run to its
    run directory, read all along by a watcher as a serving system would."""
    require("s3fs")
    require("moto")
    s3 = S3Server()
    http = HttpShardServer(digits_shards)
    s3.start()
    http.start()
    runs = {"s3": tmp_path / "from-s3", "http": tmp_path / "from-http"}
    watcher = AnytimeWatcher(runs["http"] / "anytime")
    try:
        urls = {"s3": s3.upload(digits_shards, "datasets", "digits"), "http": http.url}
        s3.make_bucket("models")
        common = [f"data.cache_dir={tmp_path / 'node-cache'}", "log.wandb.mode=disabled"]
        extra = {"s3": ["checkpoint.anytime_to=s3://models/digits-app"], "http": []}
        launched = {kind: launch_trainer(digits_run_args(urls[kind], runs[kind], *common,
                                                         *extra[kind]),
                                         nproc=2, env=s3.env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
                    for kind in runs}
        watcher.start()
        ended = {kind: process.communicate(timeout=600) for kind, process in launched.items()}
        watcher.done.set()
        watcher.join(timeout=30)
        published = s3.filesystem().cat_file(f"models/digits-app/{MODEL_FILE}")
        pointer = json.loads(s3.filesystem().cat_file(f"models/digits-app/{POINTER_FILE}"))
    finally:
        s3.stop()
        http.stop()
    # Equal content, equal cache entries: whichever run fetched a shard first, both read it.
    assert any("fetched" in stdout for stdout, _ in ended.values())
    for kind, process in launched.items():
        assert process.returncode == 0, ended[kind][1][-3000:]
        assert read_metrics(runs[kind]) == read_metrics(uninterrupted)
        assert "not-a-secret" not in "".join(ended[kind])
    reference = final_masks(uninterrupted)
    for run_dir in runs.values():
        masks = final_masks(run_dir)
        assert masks.keys() == reference.keys()
        assert all(torch.equal(masks[name], reference[name]) for name in reference)

    # The anytime models: every read consistent, megabatches in order, the last one final.
    assert not watcher.failures and watcher.seen, watcher.failures
    assert watcher.seen == sorted(watcher.seen) and watcher.seen[-1] == 3
    local_anytime = load_exported(runs["http"] / "anytime" / MODEL_FILE)
    assert same_weights(local_anytime, load_exported(export_run(runs["http"],
                                                                tmp_path / "final.pt").path))
    assert pointer["megabatch"] == 3 and pointer["sha256"] == hashlib.sha256(published).hexdigest()
    (tmp_path / "from-s3.pt").write_bytes(published)
    assert same_weights(load_exported(tmp_path / "from-s3.pt"), local_anytime)


def final_masks(run_dir: Path) -> dict:
    return torch.load(checkpoint_folder(run_dir, 3) / "state.pt", weights_only=True)["masks"]


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.distributed
def test_a_deepspeed_run_from_http_equals_the_deepspeed_run_from_local_shards(
        digits_shards, zero_runs, tmp_path):
    require("aiohttp")
    http = HttpShardServer(digits_shards)
    http.start()
    try:
        run_dir = tmp_path / "deepspeed-from-http"
        result = run_trainer(deepspeed_run_args(http.url, run_dir, 2,
                                                f"data.cache_dir={tmp_path / 'cache'}"),
                             nproc=2, launcher="deepspeed")
    finally:
        http.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fetched" in result.stdout
    assert read_metrics(run_dir) == read_metrics(zero_runs(2))


def pause_both_ranks_after_checkpoint(megabatch: int, announce: Path) -> list[str]:
    return [f"pause:rank={rank},megabatch={megabatch},at=checkpointed,seconds=2,"
            f"announce={announce}.{rank}" for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_storage_outage_is_retried_and_one_for_good_stops_the_run_resumably(
        digits_shards, uninterrupted, tmp_path):
    """The HTTP server is stopped from outside while both ranks wait between megabatches
    (the fault hook only times it): after megabatch 1 for 4 s, which the retries ride out;
    after megabatch 2 for good, which stops the run with one line naming the shard and its
    checkpoint intact. With the server back, the same command resumes and finishes equal
    to the uninterrupted run from local shards."""
    require("aiohttp")
    server = HttpShardServer(digits_shards)
    server.start()
    run_dir = tmp_path / "run"
    # Prefetching off: a megabatch's new shards are fetched when its first pass starts.
    args = digits_run_args(server.url, run_dir, f"data.cache_dir={tmp_path / 'cache'}",
                           "data.fetch_attempts=6", "data.fetch_backoff_s=0.25",
                           "perf.prefetch_shards=false", "log.wandb.mode=disabled")
    first, second = tmp_path / "after-1", tmp_path / "after-2"
    faults = ";".join(pause_both_ranks_after_checkpoint(1, first)
                      + pause_both_ranks_after_checkpoint(2, second))
    run = launch_trainer(args, nproc=2, env={"APP_DIST_FAULT": faults},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for rank in (0, 1):
            assert wait_for(Path(f"{first}.{rank}"), run, timeout=300)
        server.stop()
        time.sleep(4)
        server.start()
        for rank in (0, 1):
            assert wait_for(Path(f"{second}.{rank}"), run, timeout=300)
        server.stop()  # for good
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
        server.stop()
    output = stdout + stderr
    assert "failed (Cannot connect to host 127.0.0.1" in output  # the first outage, retried
    assert run.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert f"{server.url}/train-" in errors[0] and "after 6 attempt(s)" in errors[0]
    assert json.loads(RunLayout(run_dir).outcome.read_text())["exit_code"] == 2
    assert verify(checkpoint_folder(run_dir, 2)) is None
    assert not checkpoint_folder(run_dir, 3).exists()

    server.start()
    try:
        resumed = run_trainer(args, nproc=2)
    finally:
        server.stop()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after megabatch 2" in resumed.stdout
    assert read_metrics(run_dir) == read_metrics(uninterrupted)
