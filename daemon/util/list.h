/* Intrusive doubly linked lists, after systemd's list.h: an item carries
 * NAME_prev and NAME_next fields (LIST_FIELDS), the list is a head pointer,
 * and one item may sit in several lists under different names. */
#pragma once

#include <stddef.h>

#define LIST_FIELDS(type, name) type *name##_prev, *name##_next

#define LIST_PREPEND(name, head, item)                                        \
        do {                                                                  \
                __typeof__(*(head)) **_head = &(head), *_item = (item);       \
                _item->name##_prev = NULL;                                    \
                _item->name##_next = *_head;                                  \
                if (*_head)                                                   \
                        (*_head)->name##_prev = _item;                        \
                *_head = _item;                                               \
        } while (0)

#define LIST_REMOVE(name, head, item)                                         \
        do {                                                                  \
                __typeof__(*(head)) **_head = &(head), *_item = (item);       \
                if (_item->name##_next)                                       \
                        _item->name##_next->name##_prev = _item->name##_prev; \
                if (_item->name##_prev)                                       \
                        _item->name##_prev->name##_next = _item->name##_next; \
                else                                                          \
                        *_head = _item->name##_next;                          \
                _item->name##_prev = _item->name##_next = NULL;               \
        } while (0)

#define LIST_FOREACH(name, i, head) for (__typeof__(head) i = (head); i; i = i->name##_next)
