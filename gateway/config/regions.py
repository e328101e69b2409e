"""Azure's region names (public cloud, Azure Government, Azure China), as resources and
tenant pins name them, so a typo is caught at load with the closest names suggested."""

from __future__ import annotations

import difflib

REGIONS = frozenset(
    {
        # Americas
        "eastus", "eastus2", "centralus", "northcentralus", "southcentralus",
        "westcentralus", "westus", "westus2", "westus3", "canadacentral", "canadaeast",
        "brazilsouth", "brazilsoutheast", "mexicocentral", "chilecentral",
        # Europe
        "northeurope", "westeurope", "uksouth", "ukwest", "francecentral", "francesouth",
        "germanywestcentral", "germanynorth", "switzerlandnorth", "switzerlandwest",
        "norwayeast", "norwaywest", "swedencentral", "swedensouth", "polandcentral",
        "italynorth", "spaincentral", "austriaeast", "belgiumcentral", "denmarkeast",
        # Asia Pacific
        "eastasia", "southeastasia", "japaneast", "japanwest", "koreacentral",
        "koreasouth", "centralindia", "southindia", "westindia", "jioindiawest",
        "jioindiacentral", "australiaeast", "australiasoutheast", "australiacentral",
        "australiacentral2", "newzealandnorth", "indonesiacentral", "malaysiawest",
        "taiwannorth", "taiwannorthwest",
        # Middle East and Africa
        "uaenorth", "uaecentral", "qatarcentral", "israelcentral", "saudiarabiaeast",
        "southafricanorth", "southafricawest",
        # Azure Government
        "usgovvirginia", "usgovarizona", "usgovtexas", "usgoviowa", "usdodeast",
        "usdodcentral",
        # Azure China
        "chinaeast", "chinaeast2", "chinaeast3", "chinanorth", "chinanorth2", "chinanorth3",
    }
)  # fmt: skip


def unknown_region(name: str) -> str | None:
    """None for an Azure region; else what to say about ``name`` (the closest names)."""
    if name in REGIONS:
        return None
    close = difflib.get_close_matches(name.lower().replace(" ", ""), sorted(REGIONS), n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return f"{name!r} is not an Azure region{hint}"
