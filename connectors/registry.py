"""The one list of CRMs syncd knows: config, runtime, routing, the reflector and
``syncd check`` loop over it. A new CRM is one connector module exporting a
``PLUGIN``, one mapping file and one line here."""
from __future__ import annotations

from connectors import close, hubspot, salesforce
from connectors.plugin import CrmPlugin

# In this order ``crm.enabled()`` lists the CRMs and narrow built-in routing rules are
# tried (broad ones, such as Salesforce's, after them).
CRM_PLUGINS: dict[str, CrmPlugin] = {p.name: p for p in (salesforce.PLUGIN, hubspot.PLUGIN, close.PLUGIN)}
