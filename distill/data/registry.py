"""Dataset specifications: domains and classes (folder names) plus human-readable names for prompts."""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from . import synth


@dataclass
class DatasetSpec:
    """A dataset laid out as ``root/<domain>/<class>/<image>``; label order is the order of ``classes``."""

    name: str
    domains: list[str]                      # folder names, in domain-index order
    classes: list[str]                      # folder names, in label order
    class_names: list[str]                  # human-readable, same order as classes
    domain_names: list[str]                 # human-readable, same order as domains
    style_domains: bool = True              # False where domains are places/cameras, not styles
    descriptions: dict[str, str] | None = None   # class folder name -> attribute description

    def class_index(self, folder: str) -> int:
        return self.classes.index(folder)

    def domain_index(self, folder: str) -> int:
        return self.domains.index(folder)


class DatasetError(ValueError):
    """A dataset name, root or layout that cannot be used."""


def humanize(folder: str) -> str:
    """Folder name -> prompt text: underscores/hyphens to spaces, CamelCase split and lowercased, acronyms kept."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", folder.replace("_", " ").replace("-", " ")).split()
    return " ".join(w if w.isupper() and len(w) > 1 else w.lower() for w in words)


def _spec(name, domains, classes, style_domains=True, class_names=None, domain_names=None, descriptions=None):
    class_names = class_names or {}
    domain_names = domain_names or {}
    return DatasetSpec(
        name=name,
        domains=list(domains),
        classes=list(classes),
        class_names=[class_names.get(c, humanize(c)) for c in classes],
        domain_names=[domain_names.get(d, humanize(d)) for d in domains],
        style_domains=style_domains,
        descriptions=descriptions,
    )


OFFICEHOME_CLASSES = [
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar", "Candles",
    "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser", "Exit_Sign", "Fan",
    "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard",
    "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan",
    "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler", "Scissors",
    "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table", "Telephone", "ToothBrush",
    "Toys", "Trash_Can", "Webcam",
]

DOMAINNET_CLASSES = sorted("""
aircraft_carrier airplane alarm_clock ambulance angel animal_migration ant anvil apple arm asparagus axe backpack
banana bandage barn baseball baseball_bat basket basketball bat bathtub beach bear beard bed bee belt bench bicycle
binoculars bird birthday_cake blackberry blueberry book boomerang bottlecap bowtie bracelet brain bread bridge broccoli
broom bucket bulldozer bus bush butterfly cactus cake calculator calendar camel camera camouflage campfire candle
cannon canoe car carrot castle cat ceiling_fan cello cell_phone chair chandelier church circle clarinet clock cloud
coffee_cup compass computer cookie cooler couch cow crab crayon crocodile crown cruise_ship cup diamond dishwasher
diving_board dog dolphin donut door dragon dresser drill drums duck dumbbell ear elbow elephant envelope eraser eye
eyeglasses face fan feather fence finger fire_hydrant fireplace firetruck fish flamingo flashlight flip_flops
floor_lamp flower flying_saucer foot fork frog frying_pan garden garden_hose giraffe goatee golf_club grapes grass
guitar hamburger hammer hand harp hat headphones hedgehog helicopter helmet hexagon hockey_puck hockey_stick horse
hospital hot_air_balloon hot_dog hot_tub hourglass house house_plant hurricane ice_cream jacket jail kangaroo key
keyboard knee knife ladder lantern laptop leaf leg light_bulb lighter lighthouse lightning line lion lipstick lobster
lollipop mailbox map marker matches megaphone mermaid microphone microwave monkey moon mosquito motorbike mountain
mouse moustache mouth mug mushroom nail necklace nose ocean octagon octopus onion oven owl paintbrush paint_can
palm_tree panda pants paper_clip parachute parrot passport peanut pear peas pencil penguin piano pickup_truck
picture_frame pig pillow pineapple pizza pliers police_car pond pool popsicle postcard potato power_outlet purse
rabbit raccoon radio rain rainbow rake remote_control rhinoceros rifle river roller_coaster rollerskates sailboat
sandwich saw saxophone school_bus scissors scorpion screwdriver sea_turtle see_saw shark sheep shoe shorts shovel
sink skateboard skull skyscraper sleeping_bag smiley_face snail snake snorkel snowflake snowman soccer_ball sock
speedboat spider spoon spreadsheet square squiggle squirrel stairs star steak stereo stethoscope stitches stop_sign
stove strawberry streetlight string_bean submarine suitcase sun swan sweater swing_set sword syringe t-shirt table
teapot teddy-bear telephone television tennis_racquet tent The_Eiffel_Tower The_Great_Wall_of_China The_Mona_Lisa
tiger toaster toe toilet tooth toothbrush toothpaste tornado tractor traffic_light train tree triangle trombone
truck trumpet umbrella underwear van vase violin washing_machine watermelon waterslide whale wheel windmill
wine_bottle wine_glass wristwatch yoga zebra zigzag
""".split())

DATASETS: dict[str, DatasetSpec] = {
    "PACS": _spec(
        "PACS", ["art_painting", "cartoon", "photo", "sketch"],
        ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"],
    ),
    "VLCS": _spec(
        "VLCS", ["Caltech101", "LabelMe", "SUN09", "VOC2007"], ["bird", "car", "chair", "dog", "person"],
        style_domains=False,
        domain_names={"Caltech101": "Caltech101", "LabelMe": "LabelMe", "SUN09": "SUN09", "VOC2007": "VOC2007"},
    ),
    "OfficeHome": _spec(
        "OfficeHome", ["Art", "Clipart", "Product", "Real_World"], OFFICEHOME_CLASSES,
        class_names={"Postit_Notes": "post-it notes", "Flipflops": "flip flops", "ToothBrush": "toothbrush"},
    ),
    "TerraIncognita": _spec(
        "TerraIncognita", ["location_100", "location_38", "location_43", "location_46"],
        ["bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel"],
        style_domains=False,
    ),
    "DomainNet": _spec(
        "DomainNet", ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"], DOMAINNET_CLASSES,
        class_names={"The_Eiffel_Tower": "the Eiffel Tower", "The_Great_Wall_of_China": "the Great Wall of China",
                     "The_Mona_Lisa": "the Mona Lisa", "t-shirt": "t-shirt"},
    ),
    "synth": _spec("synth", synth.DOMAINS, synth.CLASSES, descriptions=synth.descriptions()),
}

FOLDER = "folder"   # the name under which domains and classes are inferred from the root


def _lookup(name: str) -> DatasetSpec:
    for key, spec in DATASETS.items():
        if key.lower() == str(name).lower():
            return spec
    raise DatasetError(f"unknown dataset {name!r}; known: {', '.join([*DATASETS, FOLDER])}")


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _infer(root: Path) -> DatasetSpec:
    domains = _subdirs(root)
    if not domains:
        raise DatasetError(f"dataset 'folder': no domain folders in {root} (expected root/<domain>/<class>/<image>)")
    classes = sorted({c for d in domains for c in _subdirs(root / d)})
    if not classes:
        raise DatasetError(f"dataset 'folder': no class folders in the domain folders of {root}")
    return _spec(FOLDER, domains, classes)


def _check_layout(spec: DatasetSpec, root: Path) -> None:
    missing = [d for d in spec.domains if not (root / d).is_dir()]
    if missing:
        raise DatasetError(f"dataset {spec.name}: missing domain folder(s) {', '.join(missing)} in {root} "
                           f"(expected {', '.join(spec.domains)})")
    present = {c for d in spec.domains for c in _subdirs(root / d)}
    unknown = sorted(present - set(spec.classes))
    absent = [c for c in spec.classes if c not in present]
    if unknown or absent:
        parts = ([f"unknown class folder(s) {', '.join(unknown)}"] if unknown else []) + \
                ([f"class folder(s) {', '.join(absent)} missing from every domain"] if absent else [])
        raise DatasetError(f"dataset {spec.name} at {root}: {'; '.join(parts)}")


def get_spec(name: str, root: str | os.PathLike | None = None) -> DatasetSpec:
    """The spec of a registered dataset (checked against ``root`` when it exists), or inferred for ``folder``.

    A ``descriptions.json`` in the root (class folder -> text) sets ``descriptions``.
    """
    root = Path(root).expanduser() if root is not None else None
    if str(name).lower() == FOLDER:
        if root is None or not root.is_dir():
            raise DatasetError(f"dataset 'folder' needs an existing root directory; got {root}")
        spec = _infer(root)
    else:
        spec = _lookup(name)
        if root is None or not root.exists() or (spec.name == "synth" and not (root / "world.json").is_file()):
            return copy.deepcopy(spec)   # nothing to check (yet): a synth world is drawn into its root on demand
        _check_layout(spec, root)
    descriptions_file = root / "descriptions.json"
    if descriptions_file.is_file():
        with open(descriptions_file) as f:
            descriptions = json.load(f)
        unknown = sorted(set(descriptions) - set(spec.classes))
        if unknown:
            raise DatasetError(f"{descriptions_file}: unknown class folder(s) {', '.join(unknown)}")
        spec = replace(spec, descriptions=descriptions)
    return copy.deepcopy(spec)


def validate_dataset(name: str, root: str | os.PathLike | None, test_domains: str | list[str]) -> list[str]:
    """Every problem with a dataset choice, as readable sentences (empty when it is usable). Cheap: no decoding."""
    if isinstance(test_domains, str):
        test_domains = [test_domains]
    is_folder, is_synth = str(name).lower() == FOLDER, str(name).lower() == "synth"
    spec = None
    if not is_folder:
        try:
            spec = _lookup(name)
        except DatasetError as e:
            return [str(e)]
    problems = []
    path = Path(root).expanduser() if root is not None else None
    if path is None and not is_synth:
        problems.append(f"dataset {name}: dataset.root is required")
    elif path is not None and not path.exists() and not is_synth:
        problems.append(f"dataset {name}: root {root} does not exist")
    elif is_synth and path is not None and path.is_dir() and any(path.iterdir()) \
            and not (path / "world.json").is_file():
        problems.append(f"dataset synth: root {root} is not empty and holds no world.json; "
                        f"the world will not be drawn over it")
    else:
        try:
            spec = get_spec(name, root)
        except (DatasetError, OSError, json.JSONDecodeError) as e:
            problems.append(str(e))
    if spec is not None:
        problems += [f"dataset {spec.name}: unknown test domain {d!r}; valid: {', '.join(spec.domains)}"
                     for d in test_domains if d not in spec.domains]
    return problems
