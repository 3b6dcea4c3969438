"""Pickles that carry the source code of their classes.

An object of a class decorated with `persistent_class` pickles as a call of
`_reconstruct_persistent_obj(meta)` with

    meta = dict(type='class', version=6, module_src=<source of the defining
                module>, class_name=<name>, state=<instance state>)

Unpickling executes `module_src` as a fresh module (once per distinct source
text), looks the class up in it, creates the object without calling
`__init__` and restores its state. This is the format of the snapshots of the
published EDM and EDM2 code, so those load here, and the pickles written here
load there. The constructor arguments are kept as `init_args` / `init_kwargs`,
unless the constructor sets `self._record_init_args = False` (as in EDM2).
"""

import copy
import inspect
import sys
import types
import uuid

import dnnlib

#----------------------------------------------------------------------------

_version            = 6         # Format version written into every pickle.
_decorators         = set()     # Every decorated class.
_import_hooks       = []        # Callables applied to `meta` before loading.
_module_to_src_dict = dict()    # Module object -> its source text.
_src_to_module_dict = dict()    # Source text -> module object.

#----------------------------------------------------------------------------

def persistent_class(orig_class):
    """Class decorator: pickled instances embed the source of the defining module.

    The module must be importable as `sys.modules[orig_class.__module__]`
    and its source available through `inspect`, or it must itself have
    been created from a pickle. Applying the decorator twice is harmless.
    """
    if not isinstance(orig_class, type):
        raise ValueError(f'persistent_class() decorates classes only, not {orig_class!r}.')
    if is_persistent(orig_class):
        return orig_class
    if orig_class.__module__ not in sys.modules:
        raise ValueError(f'The module "{orig_class.__module__}" of {orig_class.__name__} is not imported; import it before decorating.')
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record = getattr(self, '_record_init_args', True)
            self._init_args = copy.deepcopy(args) if record else None
            self._init_kwargs = copy.deepcopy(kwargs) if record else None

        @property
        def init_args(self):
            if self._init_args is None:
                raise ValueError(f'{type(self).__name__} was built with _record_init_args = False, so it kept no init_args; construct it without that flag.')
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            if self._init_kwargs is None:
                raise ValueError(f'{type(self).__name__} was built with _record_init_args = False, so it kept no init_kwargs; construct it without that flag.')
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                    class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    _decorators.add(Decorator)
    return Decorator

#----------------------------------------------------------------------------

def is_persistent(obj):
    """True for a persistent class, or an instance of one."""
    try:
        if obj in _decorators:
            return True
    except TypeError:
        pass
    return type(obj) in _decorators

#----------------------------------------------------------------------------

def import_hook(hook):
    """Register `hook(meta) -> meta`, called on every persistent object as it
    is unpickled, before its module source is executed. A hook can patch the
    source of old pickles. `meta` is an EasyDict with the fields above."""
    if not callable(hook):
        raise ValueError(f'import_hook() needs a callable, not {hook!r}.')
    _import_hooks.append(hook)

#----------------------------------------------------------------------------

def _reconstruct_persistent_obj(meta):
    """Unpickling entry point written into every persistent pickle."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state) if meta.get('state') is not None else None
    for hook in _import_hooks:
        meta = hook(meta)
        if meta is None:
            raise ValueError('A persistence import hook returned None; it must return the (possibly modified) meta.')
    if meta.type != 'class':
        raise ValueError(f'Unsupported persistent object type "{meta.type}" in the pickle.')
    if meta.version > _version:
        raise ValueError(f'The pickle uses persistence format version {meta.version}, newer than this code ({_version}); update the repository.')

    module = _src_to_module(meta.module_src)
    if meta.class_name not in module.__dict__:
        raise ValueError(f'The pickle names class "{meta.class_name}", which its embedded source does not define.')
    decorator_class = persistent_class(module.__dict__[meta.class_name])
    obj = decorator_class.__new__(decorator_class)
    if meta.state is not None:
        setstate = getattr(obj, '__setstate__', None)
        if callable(setstate):
            setstate(meta.state)
        else:
            obj.__dict__.update(meta.state)
    return obj

def _module_to_src(module):
    """Source text of a module, as it was when first needed."""
    src = _module_to_src_dict.get(module, None)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
    return src

def _src_to_module(src):
    """A module created by executing `src`; one module per distinct source."""
    module = _src_to_module_dict.get(src, None)
    if module is None:
        module_name = '_imported_module_' + uuid.uuid4().hex
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        _module_to_src_dict[module] = src
        _src_to_module_dict[src] = module
        exec(src, module.__dict__) # pylint: disable=exec-used
    return module

#----------------------------------------------------------------------------
