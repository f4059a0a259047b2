"""Models shared by the methods: backbones (``labelwise.modeling.backbones``)."""
