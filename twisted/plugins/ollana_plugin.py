"""twistd ollana: Ollana's plugin, the one service maker (ollana serve gives it to twistd
too)."""

from twisted.application.service import ServiceMaker

from ollana import DESCRIPTION

ollana = ServiceMaker("ollana", "ollana.tap", DESCRIPTION, "ollana")
