"""The `twistd nixeryd` plugin: points at nixeryd.tap, imported only when used."""
from twisted.application.service import ServiceMaker

nixeryd = ServiceMaker(
    "nixeryd",
    "nixeryd.tap",
    "A container registry that builds images on demand with Nix.",
    "nixeryd",
)
