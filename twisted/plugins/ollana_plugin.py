from twisted.application.service import ServiceMaker

ollana = ServiceMaker(
    "ollana", "ollana.tap", "Every Ollama on the LAN, from every device.", "ollana"
)
