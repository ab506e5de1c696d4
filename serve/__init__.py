"""Ray Serve application of the fitted adaptive ensemble (``serve.app:build_app``)."""
