"""Ray Serve deployments for detserve: ``serve.app`` (the deployment and ``build_app`` for
deploy.yaml), ``serve.run`` (``detserve serve``), ``serve.client`` (an HTTP client)."""
