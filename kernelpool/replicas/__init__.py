"""Several replicas behind HAProxy (docs/scale-out.md): each user has a home replica; the proxy
routes by the user key in tokens through a map kept current here; users are placed and moved."""
