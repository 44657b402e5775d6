/* The catalog: turns a model path into components and their safetensors
 * files, with parsed and validated headers.
 *
 * Layouts: a single *.safetensors file; a directory with model.safetensors
 * (or diffusion_pytorch_model.safetensors); a directory with a
 * *.safetensors.index.json whose weight_map names the shards; a directory of
 * *.safetensors files taken in sorted order; a diffusers directory whose
 * model_index.json names components in sub-folders, each resolved by the
 * same rules.  Every path is opened beneath a root directory fd.
 *
 * Thread safety: catalog_resolve(), catalog_list() and
 * catalog_cached_headers() may be called concurrently, from any threads, on
 * one Catalog.  An internal mutex guards its header cache and memos; it is
 * held only to look an entry up or insert one, never across open(), fstat(),
 * a read or a header parse, so a resolve whose index memo and headers are
 * cached parses no header and no index (it opens, lists folders, fstat()s;
 * a diffusers model still reads its small model_index.json) and never waits
 * behind another model's parse or I/O.  Two threads that find the same file
 * uncached both parse it; the first to insert its header wins and the
 * other's copy is dropped, so that the cache holds one header per file
 * identity and both Components reference it.
 * catalog_new(), catalog_free() and catalog_set_parse_hook() are not
 * concurrent with anything else on that catalog.  A Component, ComponentList
 * or CatalogFile is owned by its caller and not shared: it may be handed to
 * another thread, and freed there; the StHeaders it references are immutable
 * and their reference count is atomic.  Errors go to the caller's WdError
 * only. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "format/safetensors.h"
#include "util/error.h"
#include "util/fs-util.h"

typedef enum ComponentKind {
        COMPONENT_WEIGHTS,     /* has safetensors files */
        COMPONENT_ABSENT,      /* model_index.json says [null, ...] */
        COMPONENT_MISSING,     /* listed, but its folder does not exist */
        COMPONENT_NO_WEIGHTS,  /* a folder without weights (scheduler, tokenizer) */
        COMPONENT_PICKLE_ONLY, /* only .bin/.pt/.pth/.ckpt checkpoints */
        _COMPONENT_KIND_MAX,
} ComponentKind;

const char *component_kind_to_string(ComponentKind k);

typedef struct ComponentInfo {
        char *name;       /* "" for a model that is not a diffusers pipeline */
        char *library;    /* from model_index.json, or NULL */
        char *class_name; /* from model_index.json, or NULL */
        ComponentKind kind;
} ComponentInfo;

typedef struct ComponentList {
        bool diffusers;
        size_t n;
        ComponentInfo *items;
} ComponentList;

ComponentList *component_list_free(ComponentList *l);
DEFINE_TRIVIAL_CLEANUP_FUNC(ComponentList *, component_list_free);

typedef struct CatalogFile {
        char *path;    /* beneath the root: what fs_open_beneath() takes */
        char *display; /* root_display joined with path, for messages */
        int fd;        /* O_RDONLY, buffered */
        FileId id;
        StHeader *header;
} CatalogFile;

typedef struct Component {
        char *model;     /* the model path beneath the root, as given */
        char *name;      /* "" for a plain model */
        size_t n_files;
        CatalogFile *files;
        uint64_t total_bytes; /* sum of the files' sizes */
        size_t n_tensors;
} Component;

Component *component_free(Component *c);
/* A copy with its own descriptors and references to the same headers.
 * Returns 0 or -ENOMEM, -EMFILE. */
int component_dup(const Component *c, Component **ret);
DEFINE_TRIVIAL_CLEANUP_FUNC(Component *, component_free);

typedef struct Catalog Catalog;

/* root_fd is borrowed: it must outlive the catalog.  root_display is how
 * messages name the root ("/srv/models"); paths are shown beneath it.
 * The catalog keeps up to CATALOG_CACHE_MAX headers (by file identity),
 * checked sharded indexes and sets of files found to hold unique tensor
 * names, each least recently used first to go: enough for a node with
 * 10,000 resident components of a few files each, so that a resident load
 * parses nothing.  catalog_new_sized() takes another bound (1 .. 2^30), for
 * tests. */
#define CATALOG_CACHE_MAX 65536u
int catalog_new(Catalog **ret, int root_fd, const char *root_display);
int catalog_new_sized(Catalog **ret, int root_fd, const char *root_display, uint32_t cache_max);
Catalog *catalog_free(Catalog *c);
DEFINE_TRIVIAL_CLEANUP_FUNC(Catalog *, catalog_free);

/* The components of a model, read from model_index.json and directory
 * listings only: no safetensors file is opened.
 * Returns 0, or WD_E_NOT_FOUND, WD_E_FORMAT, WD_E_PERMISSION, -errno with
 * err filled. */
int catalog_list(Catalog *c, const char *model, ComponentList **ret, WdError *err);

/* Resolve one component (NULL or "" for a plain model) into its files, each
 * opened and its header validated (cached by file identity).
 * Returns 0, or WD_E_NOT_FOUND, WD_E_UNSUPPORTED, WD_E_FORMAT,
 * WD_E_PERMISSION, WD_E_INVALID, -errno with err filled. */
int catalog_resolve(Catalog *c, const char *model, const char *component, Component **ret, WdError *err);

/* Number of headers held in the identity cache. */
size_t catalog_cached_headers(Catalog *c);

/* For tests: called (outside the catalog's lock) just before a header that
 * is not cached is parsed, or a sharded index that is not remembered, with
 * the file's path beneath the root.  NULL, the default, for none.  Set it
 * before the catalog is used concurrently. */
typedef void (*CatalogParseHook)(void *userdata, const char *path);
void catalog_set_parse_hook(Catalog *c, CatalogParseHook hook, void *userdata);
