"""One server process for the benchmark: ``python -m bench.serve overread|bare --port N``.

Both apps run with exactly the same uvicorn settings: one worker, 127.0.0.1, uvicorn's
default event loop and HTTP parser (uvloop and httptools when installed), no access log.
"""

import argparse

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("app", choices=["overread", "bare"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args()
    if args.app == "overread":
        from overread.app import create_app
        from overread.settings import Settings

        app = create_app(Settings(database_url=args.database_url, http_rate_per_second=0))  # measure, not throttle
    else:
        from bench.bare import app
    uvicorn.run(app, host="127.0.0.1", port=args.port, workers=1, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
