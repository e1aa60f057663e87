"""An adapter whose module cannot be imported: it needs a package that is not installed (detserve's tests)."""

import dtlpy as dl
import detserve_test_package_that_is_not_installed  # noqa: F401


class Adapter(dl.BaseModelAdapter):
    def load(self, local_path, **kwargs):
        pass

    def predict(self, batch, **kwargs):
        return [dl.AnnotationCollection() for _ in batch]
