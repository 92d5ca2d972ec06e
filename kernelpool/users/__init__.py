"""Users, their tokens, their MCP sessions, and the throttle on failed logins."""
