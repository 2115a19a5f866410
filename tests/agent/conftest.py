"""The `weft agent` process fixtures of test_cli.py, shared by the other agent tests."""

from tests.agent.test_cli import start_agent, token_file

__all__ = ["start_agent", "token_file"]
