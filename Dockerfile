# kernelpool: one container, one server, one Jupyter kernel per (user, notebook), each run as
# that user's own uid in a cgroup. See docs/deployment.md for the `docker run` line and the
# privileges it needs.
#
# BASE: any Debian bookworm image with Python 3.11 and its venv module as `python3`. The default
# is the official image; CI builds on a stand-in made with debootstrap (no registry there).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# tini is PID 1: it forwards signals to the server and reaps kernels' orphaned children.
# `-e 143`: the server re-raises SIGTERM after its graceful shutdown (uvicorn does); that is
# a clean stop, reported as 0.
# libseccomp2: the kernels' seccomp filter is built with it (through pyseccomp; apt already
# pulls it in, named here because kernelpool needs it). nftables (the nft command) carries the
# kernels' firewall for kernel_network = "egress".
# (Versions of Debian bookworm amd64; other architectures may carry another build suffix.)
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 libseccomp2=2.5.4-1+deb12u1 nftables=1.0.6-2+deb12u2 \
    && rm -rf /var/lib/apt/lists/*

# The venv lives outside /root and is world-readable: kernels run as per-user uids and use its
# python (with ipykernel). Add kernel-side packages to it: `RUN /opt/venv/bin/pip install pandas`.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# `python3`: the official image has it in /usr/local/bin, Debian's own python in /usr/bin.
RUN python3 -m venv /opt/venv && chmod 755 /opt/venv

# Dependencies first (exact pins, wheels only), so code changes do not reinstall them.
COPY requirements.lock /tmp/requirements.lock
RUN pip install --only-binary=:all: -r /tmp/requirements.lock && rm /tmp/requirements.lock

COPY pyproject.toml README.md /src/
COPY kernelpool /src/kernelpool
COPY sandbox /src/sandbox
RUN pip install --no-deps /src && pip check && rm -rf /src

COPY docker/entrypoint.sh /usr/local/bin/kernelpool-entrypoint

# The server's state (database, runtime folders) and, mounted below it, one volume per user:
#   -v /srv/kp/state:/data -v /srv/kp/alice:/data/users/alice
ENV KERNELPOOL_DATA_DIR=/data \
    KERNELPOOL_HOST=0.0.0.0 \
    KERNELPOOL_PORT=8765
VOLUME ["/data"]
EXPOSE 8765

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KERNELPOOL_PORT', '8765'), timeout=4); sys.exit(r.status != 200)"]

# Root in the container: starting kernels as other uids and writing their cgroups needs it.
# The server itself never runs user code.
ENTRYPOINT ["tini", "-e", "143", "--", "kernelpool-entrypoint"]
CMD ["serve"]
