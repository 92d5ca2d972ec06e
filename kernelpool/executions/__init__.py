"""Running code: one execution on a kernel, and the jobs that track executions."""
