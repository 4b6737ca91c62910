from twisted.application.service import ServiceMaker

from ollana import DESCRIPTION

ollana = ServiceMaker("ollana", "ollana.tap", DESCRIPTION, "ollana")
