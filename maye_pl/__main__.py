import os
import sys

# Spawned children (the vLLM engine host, the judge worker) import this module as their
# ``__mp_main__``; everything stays under the guard, so they skip the CLI's imports (~5 s).
if __name__ == "__main__" and sys.argv[1:2] == ["engine"]:
    # `python -m maye_pl engine --listen HOST:PORT`: an engine server for `rollout.remote_engines`
    # on an inference machine; it needs none of the trainer's imports (Lightning, the CLI).
    from maye_pl.rollout.engine_server import main

    main(sys.argv[2:])
elif __name__ == "__main__":
    from maye_pl.rollout import vllm_host

    # The process that will own the engine (global rank 0; Lightning re-runs this command for the
    # other local ranks with LOCAL_RANK set) starts an engine host now: vLLM's import then runs
    # beside the CLI's instead of after it. A run that never starts a vLLM engine stops it.
    # MAYE_PL_PRESTART_ENGINE=0 turns this off (scripts/bench_startup.py measures both), and so
    # do --rollout.remote_engines (the engines run elsewhere) and --rollout.engine hf (no vLLM) on
    # the command line: vLLM's import would cost them ~12 s of CPU for nothing.
    owns_engine = os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
    remote = any(word.startswith("--rollout.remote_engines") for word in sys.argv)
    hf = "--rollout.engine=hf" in sys.argv or any(
        word == "--rollout.engine" and value == "hf" for word, value in zip(sys.argv, sys.argv[1:]))
    wanted = os.environ.get("MAYE_PL_PRESTART_ENGINE", "1") != "0" and not remote and not hf
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if wanted and owns_engine and command in ("fit", "validate", "test") and not {"-h", "--help"} & set(sys.argv):
        vllm_host.prestart_host()

    from maye_pl.cli import main

    main()
