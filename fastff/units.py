"""Units of models: names, conversion to OpenMM's units, and the checks MD engines run.

Every fastff model carries ``length_unit`` and ``energy_unit`` (fastff's own models: "nm" and
"kJ/mol"; a converted torch_geometric model: "Angstrom" and the energy unit its trainer used).
An engine adapter (:class:`fastff.ase.Calculator`, :func:`fastff.openmm.as_force`) reads them
with :func:`model_units`: an explicit unit argument must agree with the model's, and a model
without units needs explicit arguments, so no factor of 10 slips in silently. Conversion factors
are CODATA 2018, as OpenMM uses them (ASE's adapter converts with ``ase.units`` instead, so each
engine sees its own constants).
"""

from __future__ import annotations

__all__ = ["ENERGY_UNITS", "LENGTH_UNITS", "energy_unit", "kj_per_mol", "length_unit",
           "model_units", "nm", "check_cutoff"]

#: nm per unit of length, by canonical name.
LENGTH_UNITS: dict[str, float] = {"nm": 1.0, "Angstrom": 0.1, "Bohr": 0.0529177210903}
#: kJ/mol per unit of energy, by canonical name (eV and Hartree times Avogadro's number).
ENERGY_UNITS: dict[str, float] = {"kJ/mol": 1.0, "kcal/mol": 4.184, "eV": 96.48533212331002,
                                  "meV": 0.09648533212331002, "Hartree": 2625.4996394798254}

_LENGTH_ALIASES = {"nm": "nm", "nanometer": "nm", "nanometers": "nm", "a": "Angstrom",
                   "angstrom": "Angstrom", "angstroms": "Angstrom", "\u00e5": "Angstrom",
                   "bohr": "Bohr"}
_ENERGY_ALIASES = {"kj/mol": "kJ/mol", "kcal/mol": "kcal/mol", "ev": "eV", "mev": "meV",
                   "hartree": "Hartree", "ha": "Hartree"}

#: The shortest cutoff a model can meaningfully have (nm): below 1 Angstrom it sees no bonded
#: neighbour (O-H is 0.96 A), which is what a cutoff read in the wrong length unit looks like
#: (fastff's default 0.5 nm read as Angstrom).
MIN_CUTOFF_NM = 0.1


def length_unit(name, argument: str = "length_unit") -> str:
    """The canonical name of a length unit ("nm", "Angstrom", "Bohr"); case and common spellings
    ("A", "angstrom", "nanometer") are accepted."""
    if not isinstance(name, str) or name.lower() not in _LENGTH_ALIASES:
        raise ValueError(f"{argument} must be one of {sorted(LENGTH_UNITS)} (or a spelling such "
                         f"as 'A'), got {name!r}")
    return _LENGTH_ALIASES[name.lower()]


def energy_unit(name, argument: str = "energy_unit") -> str:
    """The canonical name of an energy unit ("kJ/mol", "kcal/mol", "eV", "meV", "Hartree")."""
    if not isinstance(name, str) or name.lower() not in _ENERGY_ALIASES:
        raise ValueError(f"{argument} must be one of {sorted(ENERGY_UNITS)}, got {name!r}")
    return _ENERGY_ALIASES[name.lower()]


def nm(unit: str) -> float:
    """nm per ``unit`` of length."""
    return LENGTH_UNITS[length_unit(unit)]


def kj_per_mol(unit: str) -> float:
    """kJ/mol per ``unit`` of energy."""
    return ENERGY_UNITS[energy_unit(unit)]


def model_units(model, length: str | None = None, energy: str | None = None) -> tuple[str, str]:
    """(length unit, energy unit) of ``model``, canonical.

    ``length`` / ``energy``: units the caller states. Where the model carries a unit
    (``model.length_unit``, ``model.energy_unit``), a stated one must name the same unit; where
    it carries none, the stated one is used, and stating none raises.
    """
    out = []
    for kind, given, canonical in (("length_unit", length, length_unit),
                                   ("energy_unit", energy, energy_unit)):
        own = getattr(model, kind, None)
        own = None if own is None else canonical(own, f"{type(model).__name__}.{kind}")
        given = None if given is None else canonical(given, kind)
        if own is None and given is None:
            raise ValueError(f"the model ({type(model).__name__}) has no {kind} and none was "
                             f"given: pass {kind}=... or set model.{kind}")
        if own is not None and given is not None and own != given:
            raise ValueError(f"{kind}={given!r} contradicts the model's {kind} {own!r}: a model "
                             f"computes in one unit; drop the argument or fix model.{kind}")
        out.append(own if own is not None else given)
    return str(out[0]), str(out[1])


def check_cutoff(cutoff: float, nm_per_unit: float, unit: str) -> None:
    """Raise when a model's cutoff, read in its length unit (``nm_per_unit`` nm each, named
    ``unit`` in the message), is too short to see any neighbour: the sign of a cutoff meant for
    another unit (e.g. fastff's default 0.5, meant as nm, on a model labelled Angstrom)."""
    if cutoff * nm_per_unit < MIN_CUTOFF_NM:
        raise ValueError(f"the model's cutoff {cutoff} {unit} is shorter than any bond "
                         f"({MIN_CUTOFF_NM * 10:g} Angstrom): no atom would have a neighbour. Is "
                         "its length unit right? (fastff's models default to nm: cutoff 0.5 nm "
                         "is 5 Angstrom)")
