"""Pickles that carry the source code of their classes, in EDM's and EDM2's format: an instance pickles as
`_reconstruct_persistent_obj(meta)`, meta holding the module's source, the class name and the state."""

import copy
import inspect
import sys
import types
import uuid

import dnnlib

#----------------------------------------------------------------------------

_version            = 6         # Written into every pickle.
_decorators         = set()
_import_hooks       = []
_module_to_src_dict = dict()
_src_to_module_dict = dict()

#----------------------------------------------------------------------------

def persistent_class(orig_class):
    """Class decorator: pickles embed the module's source; init_args/kwargs are kept unless _record_init_args=False."""
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class
    assert orig_class.__module__ in sys.modules
    orig_module_src = _module_to_src(sys.modules[orig_class.__module__])

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
            return _recorded(self, self._init_args, 'init_args')

        @property
        def init_kwargs(self):
            return dnnlib.EasyDict(_recorded(self, self._init_kwargs, 'init_kwargs'))

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                    class_name=self._orig_class_name, state=fields[2])
                fields[:3] = [_reconstruct_persistent_obj, (meta,), None]
            return tuple(fields)

    for attr in ('__name__', '__qualname__', '__module__', '__doc__'):
        setattr(Decorator, attr, getattr(orig_class, attr))
    _decorators.add(Decorator)
    return Decorator

def _recorded(obj, value, what):
    if value is None:
        raise ValueError(f'{type(obj).__name__} was built with _record_init_args = False and kept no {what}.')
    return copy.deepcopy(value)

#----------------------------------------------------------------------------

def is_persistent(obj):
    try:
        return obj in _decorators or type(obj) in _decorators
    except TypeError: # Unhashable.
        return type(obj) in _decorators

def import_hook(hook):
    """Register `hook(meta) -> meta`, applied to every persistent object before loading."""
    assert callable(hook)
    _import_hooks.append(hook)

#----------------------------------------------------------------------------

def _reconstruct_persistent_obj(meta):
    """Unpickling entry point written into every persistent pickle."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state) if meta.get('state') is not None else None
    for hook in _import_hooks:
        meta = hook(meta)
        assert meta is not None
    if meta.type != 'class':
        raise ValueError(f'Unsupported persistent object type "{meta.type}" in the pickle.')
    if meta.version > _version:
        raise ValueError(f'The pickle has persistence version {meta.version} (newer than {_version}); update the code.')

    module = _src_to_module(meta.module_src)
    if meta.class_name not in module.__dict__:
        raise ValueError(f'The pickle names class "{meta.class_name}", which its embedded source lacks.')
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
    if module not in _module_to_src_dict:
        _module_to_src_dict[module] = src = inspect.getsource(module)
        _src_to_module_dict[src] = module
    return _module_to_src_dict[module]

def _src_to_module(src):
    if src not in _src_to_module_dict:
        module = types.ModuleType('_imported_module_' + uuid.uuid4().hex)
        sys.modules[module.__name__] = _src_to_module_dict[src] = module
        _module_to_src_dict[module] = src
        exec(src, module.__dict__) # pylint: disable=exec-used
    return _src_to_module_dict[src]

#----------------------------------------------------------------------------
