"""Prove the suite's cluster behaviour on Ray's own simulated multi-node clusters, on one machine.

    scripts/cluster_sim.sh                       # all scenes, about 9 minutes on 2 cores; CI runs it
    scripts/cluster_sim.sh --only data-parallel  # one scene (autoscaling, data-parallel, node-loss)

Four scenes, each driven through the project's own commands (`python -m tune`,
`python -m train` with `--address`), tiny models on the embedded digits:

1. autoscaling search: a head that takes no trials and a worker type that autoscales from 0
   nodes (Ray's `fake_multinode` provider under its v1 autoscaler, `RAY_FAKE_CLUSTER=1`).
   4 single-worker trials; the autoscaler must launch >= 2 nodes, >= 2 trials must overlap
   in time (from Tune's own per-trial records) and all 4 must complete.
2. data-parallel autoscaling search: the same kind of cluster with up to 4
   one-CPU nodes, 4 trials of 2 workers each (a TorchTrainer per trial), so 2 trials' worker
   groups fit at once. Every trial must complete, and Tune's per-trial records must show 2
   trials at once, never more. Before the fix the second pair waited forever: ASHA ended the
   first pair at their last report, their controllers died with the trials and left their
   workers' placement groups reserved.
3. node loss under training (`ray.cluster_utils.Cluster`, nodes with logical resources): a
   2-worker run over 2 one-CPU nodes; after its first checkpoint a node running a worker is
   killed; the run must finish from its latest checkpoint with the step and sequence counts
   of an uninterrupted run.
4. node loss under a search trial: the node running a trial is killed; Tune must retry the
   trial from its checkpoint and complete every trial.

The last line reads `sim: max_concurrent_trials=N nodes_launched=M data_parallel_trials=4/4
data_parallel_at_once=2 train_node_loss=recovered tune_node_loss=recovered` (`skipped` for
a scene left out with --only); the exit status is non-zero if any scene fails.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAD_RESOURCE = "lstm_ae_head"
TINY = ["--preset", "smoke", "--hidden-size", "64"]
# Node-loss scenes train long enough for a node to die mid-run: the node is killed once step
# 50's checkpoint is registered, and 100 steps of hidden 256 (tens of seconds) remain.
NODE_LOSS_STEPS = 150
SLOWER = [
    "--preset",
    "smoke",
    "--hidden-size",
    "256",
    "--max-steps",
    str(NODE_LOSS_STEPS),
    "--eval-every",
    "50",
    "--checkpoint-every",
    "50",
]


class SceneFailed(RuntimeError):
    pass


def say(message: str) -> None:
    print(f"[sim {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_binary() -> str:
    return str(Path(sys.executable).with_name("ray"))


def run_command(
    arguments: list[str], env: dict[str, str], log: Path, timeout: float
) -> subprocess.CompletedProcess:
    say("$ " + " ".join(arguments))
    with open(log, "w") as output:
        try:
            completed = subprocess.run(
                arguments, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            print(log.read_text()[-3000:], flush=True)
            raise SceneFailed(f"{arguments[2]} still ran after {timeout:.0f} s (log {log})") from None
    if completed.returncode != 0:
        print(log.read_text()[-3000:], flush=True)
        raise SceneFailed(f"{arguments[2]} exited {completed.returncode} (log {log})")
    return completed


# ------------------------------------------------------------------------ 1 and 2. autoscaling searches


def autoscaling_config(port: int, max_nodes: int) -> dict:
    """A v1 autoscaler config for the fake_multinode provider (the wheel lacks its example.yaml)."""
    empty_lists = (
        "cluster_synced_files initialization_commands setup_commands head_setup_commands "
        "worker_setup_commands head_start_ray_commands worker_start_ray_commands"
    )
    return {
        "cluster_name": "lstm-ae-sim",
        "max_workers": max_nodes,
        "idle_timeout_minutes": 5,
        "upscaling_speed": 10.0,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{port}",
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {HEAD_RESOURCE: 1}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {
                "resources": {"CPU": 1, "object_store_memory": 100 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_nodes,
            },
        },
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in empty_lists.split()},
    }


def tune_result_rows(result_file: Path) -> list[dict]:
    """The reports Tune wrote for one trial (result.json holds one JSON object a line)."""
    return [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]


def trial_intervals(experiment: Path) -> list[tuple[float, float]]:
    """(start, end) wall-clock times of every trial, from Tune's per-trial result.json."""
    intervals = []
    for result_file in sorted(experiment.glob("*/result.json")):
        rows = tune_result_rows(result_file)
        if rows:
            start = min(row["timestamp"] - row["time_total_s"] for row in rows)
            intervals.append((start, max(row["timestamp"] for row in rows)))
    return intervals


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = best = 0
    for _, change in events:
        running += change
        best = max(best, running)
    return best


def completed_rows(experiment: Path) -> list[dict[str, str]]:
    with open(experiment / "results.csv") as file:
        return list(csv.DictReader(file))


def token_environment(env: dict[str, str]) -> dict[str, str]:
    """A token for Ray's token authentication where this machine has none yet (`ray start`
    with RAY_AUTH_MODE=token refuses to start without one); nothing is written to ~/.ray."""
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH"):
        return {}
    if (Path.home() / ".ray" / "auth_token").is_file():
        return {}
    return {"RAY_AUTH_TOKEN": secrets.token_hex(16)}


@contextlib.contextmanager
def autoscaling_cluster(work: Path, env: dict[str, str], max_nodes: int, tag: str):
    """A fake_multinode cluster under Ray's autoscaler, from 0 to `max_nodes` one-CPU worker
    nodes; yields (address, environment for commands against it) and stops it afterwards."""
    port = free_port()
    config_file = work / f"{tag}.json"
    config_file.write_text(json.dumps(autoscaling_config(port, max_nodes=max_nodes), indent=2))
    scene_env = {
        **env,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "LSTM_AE_AUTOSCALING_CONFIG": str(config_file),  # how the driver learns the node types
        "RAY_AUTH_MODE": "token",  # `ray start` turns token authentication on; clients must use it too
        **token_environment(env),
    }
    start = [
        ray_binary(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
        f"--resources={json.dumps({HEAD_RESOURCE: 1})}", f"--autoscaling-config={config_file}",
        "--include-dashboard=false", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        run_command(start, scene_env, work / f"{tag}_ray_start.log", timeout=180)
        yield f"127.0.0.1:{port}", scene_env
    finally:
        subprocess.run([ray_binary(), "stop", "--force"], env=scene_env, capture_output=True, timeout=120)


def scene_autoscaling_search(work: Path, env: dict[str, str]) -> tuple[int, int]:
    with autoscaling_cluster(work, env, max_nodes=3, tag="autoscaling") as (address, scene_env):
        search = [
            sys.executable, "-m", "tune", *TINY, "--num-samples", "4", "--max-steps", "30",
            "--eval-every", "10", "--checkpoint-every", "10", "--grace-period", "3",
            "--address", address, "--output-dir", str(work / "runs"), "--name", "autoscaling",
            "--cache-dir", str(work / "data"),
        ]  # fmt: skip
        run_command(search, scene_env, work / "autoscaling_search.log", timeout=600)
        nodes = launched_nodes(address, scene_env)
    experiment = work / "runs" / "autoscaling"
    at_once = most_at_once(trial_intervals(experiment))
    statuses = [row["status"] for row in completed_rows(experiment)]
    say(
        f"autoscaling search: {nodes} worker node(s) launched, {at_once} trial(s) at once, statuses {statuses}"
    )
    if nodes < 2 or at_once < 2 or statuses != ["completed"] * 4:
        raise SceneFailed("the autoscaling search did not fill the cluster (see above)")
    return at_once, nodes


def scene_data_parallel_search(work: Path, env: dict[str, str]) -> tuple[str, int]:
    """Issue 20: more 2-worker trials than the autoscaling cluster holds at once."""
    trials, workers, max_nodes = 4, 2, 4
    holds = max_nodes // workers  # one-CPU nodes: a worker each
    started = time.time()
    log = work / "data_parallel_search.log"
    with autoscaling_cluster(work, env, max_nodes=max_nodes, tag="data_parallel") as (address, scene_env):
        search = [
            sys.executable, "-m", "tune", *TINY, "--num-samples", str(trials),
            "--num-workers-per-trial", str(workers), "--max-steps", "20", "--eval-every", "10",
            "--checkpoint-every", "10", "--grace-period", "3",
            "--address", address, "--output-dir", str(work / "runs"), "--name", "data-parallel",
            "--cache-dir", str(work / "data"),
        ]  # fmt: skip
        run_command(search, scene_env, log, timeout=420)
    output = log.read_text()
    plan = next((line for line in output.splitlines() if line.startswith("plan:")), "no plan line")
    released = output.count("released placement group")
    experiment = work / "runs" / "data-parallel"
    at_once = most_at_once(trial_intervals(experiment))
    rows = completed_rows(experiment)
    statuses = [row["status"] for row in rows]
    steps = sorted({int(row["steps"]) for row in rows})
    done = statuses.count("completed")
    say(f"data-parallel search: {plan}")
    say(
        f"data-parallel search: {done}/{trials} trials completed (steps {steps}), {at_once} at once "
        f"(the cluster holds {holds}), {released} placement group(s) of ended trials released, "
        f"{time.time() - started:.0f} s"
    )
    if statuses != ["completed"] * trials or steps != [20] or not 2 <= at_once <= holds:
        raise SceneFailed("the data-parallel search did not run every trial within the cluster (see above)")
    return f"{done}/{trials}", at_once


def launched_nodes(address: str, env: dict[str, str]) -> int:
    """Worker nodes the cluster has seen (alive or gone), asked from a separate driver."""
    program = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False); "
        f"print(sum(1 for node in ray.nodes() if {HEAD_RESOURCE!r} not in node['Resources']))"
    )
    output = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=180
    )
    return int(output.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ 3 and 4. node loss


def ray_processes(node) -> list[str]:
    """The command lines of a node's Ray worker processes (`ray::<actor class>.<method>`)."""
    import psutil

    raylet = node.all_processes["raylet"][0].process
    titles = []
    try:
        children = psutil.Process(raylet.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return titles
    for child in children:
        try:
            titles.append(" ".join(child.cmdline()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return titles


def node_running(cluster, marker: str):
    """The worker node one of whose processes has `marker` in its command line."""
    for node in cluster.worker_nodes:
        if any(marker in title for title in ray_processes(node)):
            return node
    return None


def add_worker_node(cluster):
    """A one-CPU worker node. Its own address (127.0.0.1, not the head's) keeps drivers on
    the head, as `ray job submit` does on a real cluster: a driver started on this machine
    attaches to a node with its address, and Ray Train pins its controller to that node."""
    return cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")


def registered_checkpoint(run: Path) -> str | None:
    """The latest checkpoint Ray Train has registered (a folder on disk may not be yet)."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return None
    latest = snapshot.get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name")


def trial_reported_step(experiment: Path, step: int) -> bool:
    """Tune's driver has processed some trial's report of `step` (and so its checkpoint)."""
    for result_file in experiment.glob("*/result.json"):
        try:
            rows = tune_result_rows(result_file)
        except (OSError, ValueError):
            continue
        if any(row.get("step") == step for row in rows):
            return True
    return False


def wait_for(condition, what: str, timeout: float, process: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise SceneFailed(f"the command ended before {what}")
        time.sleep(0.5)
    raise SceneFailed(f"timed out waiting for {what}")


def kill_node_under(cluster, marker: str, what: str, process: subprocess.Popen) -> None:
    node = wait_for(lambda: node_running(cluster, marker), f"a node running {what}", 120, process)
    for each in [cluster.head_node, *cluster.worker_nodes]:
        titles = sorted({title.split()[0] for title in ray_processes(each) if title.startswith("ray::")})
        say(f"  node {each.node_id[:8]} ({each.address_info['node_ip_address']}): {titles}")
    say(f"killing the node running {what} ({node.node_id[:8]})")
    cluster.remove_node(node, allow_graceful=False)


def scene_train_node_loss(cluster, work: Path, env: dict[str, str]) -> str:
    steps, batch = NODE_LOSS_STEPS, 4
    command = [
        sys.executable, "-m", "train", *SLOWER, "--num-workers", "2", "--cpus-per-worker", "1",
        "--log-every", "25", "--max-failures", "3", "--address", cluster.address, "--output-dir", str(work / "runs"),
        "--name", "node-loss", "--cache-dir", str(work / "data"),
    ]  # fmt: skip
    say("$ " + " ".join(command))
    log = work / "train_node_loss.log"
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        run = work / "runs" / "node-loss"
        wait_for(
            lambda: registered_checkpoint(run) == "checkpoint_00000050", "the first checkpoint", 300, process
        )
        kill_node_under(cluster, "RayTrainWorker", "a training worker", process)
        code = process.wait(timeout=600)
    if code != 0:
        print(log.read_text()[-3000:], flush=True)
        raise SceneFailed(f"the training run exited {code} after the node loss")
    result = json.loads((run / "result.json").read_text())
    say(
        f"training: {result['steps']} steps, {result['sequences_seen']} sequences, resumed from {result['resumed_from']}"
    )
    if result["steps"] != steps or result["sequences_seen"] != steps * batch or not result["resumed_from"]:
        raise SceneFailed("the training run did not finish from its checkpoint with the full counts")
    return "recovered"


def scene_tune_node_loss(cluster, work: Path, env: dict[str, str]) -> str:
    space = work / "learning_rate_only.yaml"  # the model keeps SLOWER's size
    space.write_text("learning_rate: {loguniform: [0.001, 0.01]}\n")
    command = [
        sys.executable, "-m", "tune", *SLOWER, "--num-samples", "2", "--grace-period", "6", "--max-failures", "3",
        "--space", str(space),
        "--address", cluster.address, "--output-dir", str(work / "runs"), "--name", "trial-loss",
        "--cache-dir", str(work / "data"),
    ]  # fmt: skip
    say("$ " + " ".join(command))
    log = work / "tune_node_loss.log"
    experiment = work / "runs" / "trial-loss"
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        wait_for(lambda: trial_reported_step(experiment, 50), "a trial's first checkpoint", 300, process)
        kill_node_under(cluster, "ImplicitFunc", "a search trial", process)
        add_worker_node(cluster)  # the autoscaler's replacement
        code = process.wait(timeout=600)
    if code != 0:
        print(log.read_text()[-3000:], flush=True)
        raise SceneFailed(f"the search exited {code} after the node loss")
    statuses = [row["status"] for row in completed_rows(experiment)]
    restarted = {}  # trial -> the steps it restarted at, from its latest checkpoint
    for trial_folder in experiment.iterdir():
        checkpoints = sorted(trial_folder.glob("checkpoint_*/history.json"))
        if checkpoints:
            restarted[trial_folder.name[:40]] = json.loads(checkpoints[-1].read_text())["resumed_from"]
    say(f"search: statuses {statuses}; restarts {restarted}")
    if statuses != ["completed"] * 2 or not any(restarted.values()):
        raise SceneFailed("the search did not retry the lost trial to completion")
    return "recovered"


SCENES = ("autoscaling", "data-parallel", "node-loss")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Cluster behaviour on Ray's simulated clusters.")
    parser.add_argument("--only", choices=SCENES, action="append", help="run this scene (repeatable)")
    scenes = set(parser.parse_args(argv).only or SCENES)
    if os.environ.get("SIM_SKIP_AUTOSCALING"):  # for iterating on the node-loss scenes
        scenes.discard("autoscaling")
    work = Path(tempfile.mkdtemp(prefix="lstm_ae_sim_"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DISABLE_USAGE_STATS": "1"}
    say(f"working in {work}; scenes: {', '.join(scene for scene in SCENES if scene in scenes)}")
    started = time.time()
    at_once = nodes = dp_trials = dp_at_once = train_loss = tune_loss = "skipped"
    try:
        if "autoscaling" in scenes:
            at_once, nodes = scene_autoscaling_search(work, env)
        if "data-parallel" in scenes:
            dp_trials, dp_at_once = scene_data_parallel_search(work, env)
        if "node-loss" in scenes:
            from ray.cluster_utils import Cluster

            cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": 0,
                    "resources": {HEAD_RESOURCE: 1},
                    "include_dashboard": False,
                },
            )
            try:
                for _ in range(3):  # 1 CPU each: a 2-worker run spreads over two of them
                    add_worker_node(cluster)
                cluster.wait_for_nodes()
                train_loss = scene_train_node_loss(cluster, work, env)
                tune_loss = scene_tune_node_loss(cluster, work, env)
            finally:
                cluster.shutdown()
    except SceneFailed as error:
        say(f"FAILED: {error}")
        return 1
    say(f"all scenes passed in {time.time() - started:.0f} s")
    print(
        f"sim: max_concurrent_trials={at_once} nodes_launched={nodes} "
        f"data_parallel_trials={dp_trials} data_parallel_at_once={dp_at_once} "
        f"train_node_loss={train_loss} tune_node_loss={tune_loss}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
