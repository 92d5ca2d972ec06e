"""The fork server: `server` is the server's side, `child` the forked process's."""
